"""Components a site's model manager is built from (seed: fed_learn.components)."""
