//! The manifests in `deploy/` read as the typed Kubernetes objects they
//! claim to be, and agree with the code's defaults.
