"""Theory: [P]'s constructions (Theorems 1 and 2) and [L]'s reparameterization study."""
