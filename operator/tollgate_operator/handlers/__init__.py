"""kopf handlers, one module per kind; importing this package registers them all."""

from . import apikey, gateway, gpuexporter, lifecycle, quotapolicy

__all__ = ["apikey", "gateway", "gpuexporter", "lifecycle", "quotapolicy"]
