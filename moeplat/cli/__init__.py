"""Thin command line over the library; heavy imports happen only in the commands that need them."""
