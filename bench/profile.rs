//! `--profile DIR`: CPU profiles of the agent and the server while wrk loads them, so a missed
//! target comes with what the processes spent their time on. `perf record` samples each
//! process's cpu-clock (hardware counters are often unavailable on virtual machines) with call
//! graphs, and `perf report` writes the split between binaries, a flat (self time) and an
//! inclusive (children) table to `DIR/<name>-<process>.txt`.

use std::path::Path;
use std::time::Duration;

use crate::procs;

/// Samples each of `processes` (label, pid) for `seconds` while `load` runs, then writes the
/// reports. Returns their paths, or why there are none (perf missing or refused).
pub async fn record<F: std::future::Future>(
    dir: &Path,
    name: &str,
    processes: &[(&str, u32)],
    seconds: u32,
    load: F,
) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut recordings = Vec::new();
    for (label, pid) in processes {
        let data = dir.join(format!("{name}-{label}.data"));
        let recording = tokio::process::Command::new("perf")
            .args(["record", "-F", "999", "-g", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string(), "--", "sleep", &seconds.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("perf: {e}"))?;
        recordings.push((label, data, recording));
    }
    let limit = Duration::from_secs(u64::from(seconds) + 60);
    let waits = futures::future::join_all(
        recordings.iter_mut().map(|(_, _, recording)| tokio::time::timeout(limit, recording.wait())),
    );
    let (statuses, _) = tokio::join!(waits, load);
    if let Some(failed) = statuses.iter().find(|status| !matches!(status, Ok(Ok(s)) if s.success())) {
        return Err(format!("perf record failed: {failed:?}"));
    }
    let mut paths = Vec::new();
    for (label, data, _) in &recordings {
        let data = data.display().to_string();
        let split = report(&data, &["--no-children", "--sort", "dso"]).await;
        let flat = report(&data, &["--no-children", "--sort", "dso,sym", "--percent-limit", "0.8"]).await;
        let inclusive = report(&data, &["--children", "--sort", "sym", "--percent-limit", "5"]).await;
        let path = dir.join(format!("{name}-{label}.txt"));
        let text = format!(
            "# {label}: self time by binary\n{split}\n# {label}: self time (flat)\n{flat}\n\
             # {label}: inclusive time (children; Rust frames are missing without frame pointers)\n{inclusive}"
        );
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        paths.push(path.display().to_string());
    }
    Ok(paths)
}

/// `perf report` of `data` as text, without perf's comment lines and padding.
async fn report(data: &str, extra: &[&str]) -> String {
    let mut args: Vec<String> = ["report", "-i", data, "--stdio", "-g", "none"].map(str::to_owned).to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let text = procs::output("perf", &args, Duration::from_secs(300)).await;
    let lines = text.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty());
    lines.map(|line| format!("{}\n", line.trim_end())).collect()
}
