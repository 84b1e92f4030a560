//! The kubeconfig file that points kube-rs and kubectl at a running server.

use std::path::Path;

use serde_json::json;

/// The name used for the cluster, user and context entries.
pub const CONTEXT: &str = "vipam-kube-api";

/// A kubeconfig for a plain-HTTP server at `url`, no credentials, namespace `default`.
pub fn render(url: &str) -> String {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": url}}],
        "users": [{"name": CONTEXT, "user": {}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT, "namespace": "default"}}],
        "current-context": CONTEXT,
        "preferences": {},
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// Writes the kubeconfig to `path`.
pub fn write(path: &Path, url: &str) -> std::io::Result<()> {
    std::fs::write(path, render(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_parses_as_a_kube_rs_kubeconfig() {
        let text = render("http://127.0.0.1:1234");
        let parsed = kube::config::Kubeconfig::from_yaml(&text).expect("valid kubeconfig");
        assert_eq!(parsed.current_context.as_deref(), Some(CONTEXT));
        let cluster = parsed.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("http://127.0.0.1:1234"));
    }
}
