"""sqsd-ray: sample-level quantification of safety degradation (SQSD), scored and tested at cluster scale."""

__version__ = "0.1.0"
