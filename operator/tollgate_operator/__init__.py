"""tollgate operator: reconciles tollgate.dev custom resources with kopf."""
