"""flashclaim: a gateway for timed, limited-quantity coupon releases."""

__version__ = "0.1.0"
