"""Model zoo: plain-torch vision models that Opacus can train (no BatchNorm, no in-place tricks)."""
