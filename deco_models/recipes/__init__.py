"""Reproducible training recipes. Each module registers itself in :data:`deco_models.train.recipes.RECIPES` on import
(``shapes_mini`` → ``deco train --recipe shapes-mini``)."""
