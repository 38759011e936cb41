"""What the operator and the worker share, torch-free and Kubernetes-free: the rules of the model
shape both check (`routing`) and the PLAN.json format the operator writes and every rank reads
(`plan_json`). Both halves import it; it imports neither."""
