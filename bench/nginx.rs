//! nginx, figure 1's baseline: two worker processes serving the agent's credential document as
//! a static file, keep-alive unlimited, access log off.

use std::path::Path;

use crate::deploy::Env;
use crate::procs::Child;

/// Starts nginx (2 workers) on 127.0.0.1:`port`, serving `document` at `path`, from a scratch
/// folder called `name`.
pub fn start(env: &Env, name: &str, port: u16, path: &str, document: &str) -> Child {
    let root = env.scratch(name);
    let file = root.join("www").join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().expect("the path has folders")).expect("create nginx's tree");
    std::fs::write(&file, document).expect("write the document for nginx");
    let root = root.display();
    let conf = format!(
        "user root;\nworker_processes 2;\ndaemon off;\npid {root}/nginx.pid;\n\
         error_log {root}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 65s;\n\
         default_type application/json;\n  server {{ listen 127.0.0.1:{port}; root {root}/www; }}\n}}\n"
    );
    let conf_path = format!("{root}/nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let args =
        ["-p", &format!("{root}/"), "-e", &format!("{root}/error.log"), "-c", &conf_path].map(str::to_owned);
    Child::spawn(name, Path::new("/usr/sbin/nginx"), &args, &[], Path::new(&root.to_string()))
}

pub async fn version() -> String {
    let out = tokio::process::Command::new("/usr/sbin/nginx").arg("-v").output().await;
    let text = out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    text.trim().trim_start_matches("nginx version: ").to_owned()
}
