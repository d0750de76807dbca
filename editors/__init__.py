"""Editing methods: a shared locate-then-edit core (``editors.core``) and thin method modules."""
