"""The model lifecycle on MLflow: register, verify, load, promote, roll back."""
