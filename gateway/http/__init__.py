"""The HTTP layer: app factory, claimant, admin and ops handlers, problem documents."""
