"""Google Cloud: deploy.py turns the config into gcloud commands (Cloud Run, Vertex AI) and fills in the
YAML beside it (cloudbuild.yaml, cloudbuild-train.yaml, service.yaml, vertex-job.yaml, runmonitoring.yaml);
vertex.py is what the training image runs as a Vertex AI custom job."""
