"""embedforge: turn raw domain passages into a fine-tuned embedding model, and proof that it is better."""

__version__ = "0.1.0"
