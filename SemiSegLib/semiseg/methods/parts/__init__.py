"""Building blocks shared by several methods (heads, memories, perturbations). Not methods themselves."""
