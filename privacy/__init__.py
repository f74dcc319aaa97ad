"""Privacy at the sites: DP-SGD (Opacus), the site privacy ledger, and CKKS (TenSEAL) keys and codec."""
