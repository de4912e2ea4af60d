"""tollgate GPU exporter: NVML metrics for Prometheus."""
