"""Everything that talks to Redis: key layout, scripts, the claim batcher, campaign views."""
