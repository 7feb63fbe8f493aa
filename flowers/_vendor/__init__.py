"""Third-party code kept in the tree, each package with its source and licence.

Nothing here is edited by hand; each package's README.md says where it comes
from and how to regenerate or update it.
"""
