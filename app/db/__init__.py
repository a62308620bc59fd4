"""Database: SQLAlchemy 2 typed ORM (``orm``) and engine/session factory (``session``)."""
