"""What the tests start or call: SeaweedFS S3, Prometheus and Pushgateway, Kubernetes schemas."""
