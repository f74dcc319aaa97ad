"""Site agent: the Flower ClientApp, the local trainer, site data loaders and site-local state."""
