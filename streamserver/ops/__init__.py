"""Operating the server: access control, the drain on SIGTERM, Prometheus metrics, the admin endpoints
(model load/unload), and the operator's command-line client (`streamserver status`, `models`)."""
