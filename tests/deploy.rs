//! The deployment files under `deploy/` (issue 6, point 5), checked without a cluster or a
//! Docker engine: every YAML document under `deploy/k8s/` parses and carries the fields that
//! matter, the Dockerfile is multi-stage and ends as a non-root user, and what the manifests
//! name (flags, probe routes, configs) is what the binary accepts, serves and validates.
//! Schema validation against the Kubernetes API types is a separate step
//! (`deploy/k8s/README.md`, "Validating"). The last tests break copies of the files on
//! purpose and check that each rule notices.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use slipstream::http::TOKEN_ENV;
use yaml_rust2::{Yaml, YamlLoader};

/// The route the liveness probes must use (src/http.rs; open without the token), the
/// readiness probe's command (`/readyz` wants the token, which only an exec probe can
/// send without the secret in the manifest) and the port the deployment listens on.
const LIVENESS_PATH: &str = "/healthz";
const READINESS_ARGS: [&str; 2] = ["probe", "--ready"];
const HTTP_PORT: i64 = 8080;
/// Cores of the machine the resources are sized for.
const MAX_CPU_MILLIS: i64 = 2000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_slipstream")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    yaml: Yaml,
}

impl Doc {
    fn kind(&self) -> &str {
        self.yaml["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.yaml["metadata"]["name"].as_str().unwrap_or("")
    }
    fn id(&self) -> String {
        format!("{} {}/{}", self.file, self.kind(), self.name())
    }
}

fn parse(file: &str, text: &str) -> Vec<Doc> {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
    docs.into_iter()
        .filter(|y| !matches!(y, Yaml::Null | Yaml::BadValue))
        .map(|yaml| Doc {
            file: file.to_string(),
            yaml,
        })
        .collect()
}

/// Every `*.yaml`/`*.yml` under `dir`, recursively, in path order; file names relative to it.
fn load_dir(dir: &Path) -> Vec<Doc> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let rel = f.strip_prefix(dir).unwrap().display().to_string();
            parse(&rel, &read(f))
        })
        .collect()
}

fn k8s_docs() -> Vec<Doc> {
    load_dir(&root().join("deploy/k8s"))
}

/// The documents `kubectl apply -f deploy/k8s/` applies (that is not recursive).
fn applied(docs: &[Doc]) -> impl Iterator<Item = &Doc> {
    docs.iter().filter(|d| !d.file.contains('/'))
}

fn of_kind<'a>(docs: &'a [Doc], kind: &str) -> Vec<&'a Doc> {
    docs.iter().filter(|d| d.kind() == kind).collect()
}

fn only<'a>(docs: &'a [Doc], kind: &str) -> Result<&'a Doc, String> {
    match of_kind(docs, kind).as_slice() {
        [one] => Ok(one),
        many => Err(format!("expected exactly one {kind}, found {}", many.len())),
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers over the YAML tree
// ---------------------------------------------------------------------------------------

fn seq(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

fn strings(y: &Yaml) -> Vec<String> {
    seq(y)
        .iter()
        .map(|v| match v {
            Yaml::String(s) | Yaml::Real(s) => s.clone(),
            Yaml::Integer(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// The value after `flag` in an argument list (`--flag value` or `--flag=value`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&prefix)
        }
    })
}

/// Whether `path` is `dir` or lies below it (whole path components).
fn under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(Path::new(dir))
}

/// The container port a probe or Service port designates: a number, or a port name.
fn resolve_port(port: &Yaml, container: &Yaml) -> Option<i64> {
    match port {
        Yaml::Integer(n) => Some(*n),
        Yaml::String(name) => seq(&container["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64()),
        _ => None,
    }
}

/// A security setting from the container, else from the pod.
fn effective<'a>(pod: &'a Yaml, container: &'a Yaml, key: &str) -> &'a Yaml {
    let c = &container["securityContext"][key];
    if c.is_badvalue() {
        &pod["securityContext"][key]
    } else {
        c
    }
}

fn cpu_millis(q: &Yaml) -> Option<i64> {
    match q {
        Yaml::Integer(n) => Some(n * 1000),
        Yaml::Real(s) | Yaml::String(s) => match s.strip_suffix('m') {
            Some(m) => m.parse().ok(),
            None => s.parse::<f64>().ok().map(|c| (c * 1000.0).round() as i64),
        },
        _ => None,
    }
}

/// The container takes the API token from an optional Secret, under the server's variable.
fn check_token_env(id: &str, container: &Yaml) -> Vec<String> {
    let wired = seq(&container["env"]).iter().any(|e| {
        let key = &e["valueFrom"]["secretKeyRef"];
        e["name"].as_str() == Some(TOKEN_ENV)
            && key["name"].as_str().is_some()
            && key["optional"].as_bool() == Some(true)
    });
    if wired {
        vec![]
    } else {
        vec![format!(
            "{id}: {TOKEN_ENV} does not come from an optional Secret (secretKeyRef, optional: true)"
        )]
    }
}

/// Non-root checks shared by every pod template.
fn check_non_root(id: &str, pod: &Yaml, container: &Yaml, uid: Option<i64>) -> Vec<String> {
    let mut problems = Vec::new();
    let cname = container["name"].as_str().unwrap_or("?");
    if effective(pod, container, "runAsNonRoot").as_bool() != Some(true) {
        problems.push(format!("{id}: container {cname}: runAsNonRoot is not true"));
    }
    match effective(pod, container, "runAsUser").as_i64() {
        None | Some(0) => problems.push(format!(
            "{id}: container {cname}: runAsUser must be set to a non-zero uid"
        )),
        Some(u) if uid.is_some_and(|want| want != u) => problems.push(format!(
            "{id}: container {cname}: runAsUser {u} differs from the image's USER {}",
            uid.unwrap()
        )),
        Some(_) => {}
    }
    if container["securityContext"]["allowPrivilegeEscalation"].as_bool() != Some(false) {
        problems.push(format!(
            "{id}: container {cname}: allowPrivilegeEscalation must be false"
        ));
    }
    if container["securityContext"]["readOnlyRootFilesystem"].as_bool() != Some(true) {
        problems.push(format!(
            "{id}: container {cname}: readOnlyRootFilesystem must be true"
        ));
    }
    problems
}

/// Every volumeMount names a volume (or a volumeClaimTemplate); returns problems.
fn check_mounts_resolve(
    id: &str,
    pod: &Yaml,
    container: &Yaml,
    templates: &[String],
) -> Vec<String> {
    let volumes: BTreeSet<&str> = seq(&pod["volumes"])
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    seq(&container["volumeMounts"])
        .iter()
        .filter_map(|m| m["name"].as_str())
        .filter(|n| !volumes.contains(n) && !templates.iter().any(|t| t == n))
        .map(|n| format!("{id}: volumeMount {n} names no volume"))
        .collect()
}

/// The volume mounted at `path` or at the closest directory above it.
fn mount_for<'a>(container: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    seq(&container["volumeMounts"])
        .iter()
        .filter(|m| m["mountPath"].as_str().is_some_and(|mp| under(path, mp)))
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
}

fn volume<'a>(pod: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    seq(&pod["volumes"])
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
}

// ---------------------------------------------------------------------------------------
// Rules. Each returns the problems it found; empty means fine.
// ---------------------------------------------------------------------------------------

fn check_documents(docs: &[Doc]) -> Vec<String> {
    let mut problems = Vec::new();
    for d in docs {
        if d.yaml["apiVersion"].as_str().is_none() || d.kind().is_empty() || d.name().is_empty() {
            problems.push(format!(
                "{}: apiVersion, kind or metadata.name missing",
                d.id()
            ));
        }
        if !d.yaml["metadata"]["namespace"].is_badvalue() {
            problems.push(format!(
                "{}: sets metadata.namespace; the manifests are namespace-less (kubectl -n)",
                d.id()
            ));
        }
    }
    let kinds: BTreeSet<&str> = applied(docs).map(Doc::kind).collect();
    for want in ["ConfigMap", "StatefulSet", "Service", "CronJob"] {
        if !kinds.contains(want) {
            problems.push(format!("no {want} among the manifests kubectl applies"));
        }
    }
    problems
}

fn check_configmap(docs: &[Doc], example: &str) -> Vec<String> {
    let cm = match only(docs, "ConfigMap") {
        Ok(cm) => cm,
        Err(e) => return vec![e],
    };
    let data = &cm.yaml["data"];
    let mut problems = Vec::new();
    let tomls: Vec<&str> = data
        .as_hash()
        .map(|h| h.keys().filter_map(Yaml::as_str).collect())
        .unwrap_or_default();
    if !tomls.iter().any(|k| k.ends_with(".toml")) {
        problems.push(format!("{}: holds no *.toml key", cm.id()));
    }
    if data["experiment.toml"].as_str() != Some(example) {
        problems.push(format!(
            "{}: experiment.toml differs from deploy/examples/experiment.toml",
            cm.id()
        ));
    }
    problems
}

/// The readiness probe's exec command: the binary by absolute path, `probe --ready`, and a
/// loopback URL on the HTTP port.
fn readiness_command(probe: &Yaml) -> Vec<String> {
    strings(&probe["exec"]["command"])
}

fn check_readiness(id: &str, probe: &Yaml) -> Vec<String> {
    if !probe["httpGet"].is_badvalue() {
        return vec![format!(
            "{id}: readinessProbe uses httpGet, which cannot send the token /readyz wants without the secret in the manifest; expected an exec probe running `slipstream probe --ready`"
        )];
    }
    let cmd = readiness_command(probe);
    let mut problems = Vec::new();
    if !cmd
        .first()
        .is_some_and(|c| c.starts_with('/') && c.ends_with("/slipstream"))
    {
        problems.push(format!(
            "{id}: readinessProbe exec command {cmd:?} does not start with the slipstream binary's absolute path"
        ));
    }
    if cmd.get(1..3).is_none_or(|a| a != READINESS_ARGS) {
        problems.push(format!(
            "{id}: readinessProbe runs {cmd:?}, expected `slipstream {}`",
            READINESS_ARGS.join(" ")
        ));
    }
    let url = flag_value(&cmd, "--url").unwrap_or("");
    let loopback = [
        format!("http://127.0.0.1:{HTTP_PORT}"),
        format!("http://localhost:{HTTP_PORT}"),
    ];
    if !loopback.iter().any(|l| url.trim_end_matches('/') == l) {
        problems.push(format!(
            "{id}: readinessProbe --url {url:?} is not the server on loopback port {HTTP_PORT}"
        ));
    }
    problems
}

/// The StatefulSet with its Services: one replica, probes, ports, security, data volume.
fn check_statefulset(docs: &[Doc], image_uid: Option<i64>) -> Vec<String> {
    let sts = match only(docs, "StatefulSet") {
        Ok(s) => s,
        Err(e) => return vec![e],
    };
    let id = sts.id();
    let spec = &sts.yaml["spec"];
    let pod = &spec["template"]["spec"];
    let mut problems = Vec::new();
    if spec["replicas"].as_i64() != Some(1) {
        problems.push(format!(
            "{id}: replicas must be 1 (one instance per consumer group, README.md)"
        ));
    }
    let Some(container) = seq(&pod["containers"]).first() else {
        return vec![format!("{id}: no container")];
    };
    let args = strings(&container["args"]);
    if args.first().map(String::as_str) != Some("run") {
        problems.push(format!(
            "{id}: the container must run `slipstream run`, args are {args:?}"
        ));
    }

    // HTTP: --listen, containerPort, probes and Services all agree on one port.
    match flag_value(&args, "--listen") {
        Some(listen) => {
            let (host, port) = listen.rsplit_once(':').unwrap_or(("", ""));
            if port.parse::<i64>().ok() != Some(HTTP_PORT) {
                problems.push(format!("{id}: --listen {listen} is not port {HTTP_PORT}"));
            }
            if host != "0.0.0.0" && host != "[::]" {
                problems.push(format!(
                    "{id}: --listen {listen} must bind all interfaces for probes and the Service"
                ));
            }
        }
        None => problems.push(format!(
            "{id}: no --listen: the HTTP API and probes need it"
        )),
    }
    if !seq(&container["ports"])
        .iter()
        .any(|p| p["containerPort"].as_i64() == Some(HTTP_PORT))
    {
        problems.push(format!("{id}: no containerPort {HTTP_PORT}"));
    }
    let get = &container["livenessProbe"]["httpGet"];
    if get.is_badvalue() {
        problems.push(format!("{id}: no livenessProbe with httpGet"));
    } else {
        if get["path"].as_str() != Some(LIVENESS_PATH) {
            problems.push(format!(
                "{id}: livenessProbe path is {:?}, expected {LIVENESS_PATH}",
                get["path"].as_str()
            ));
        }
        if resolve_port(&get["port"], container) != Some(HTTP_PORT) {
            problems.push(format!("{id}: livenessProbe port is not {HTTP_PORT}"));
        }
    }
    problems.extend(check_readiness(&id, &container["readinessProbe"]));
    let startup = &container["startupProbe"]["httpGet"];
    if !startup.is_badvalue()
        && (startup["path"].as_str() != Some(LIVENESS_PATH)
            || resolve_port(&startup["port"], container) != Some(HTTP_PORT))
    {
        problems.push(format!(
            "{id}: startupProbe must use {LIVENESS_PATH} on {HTTP_PORT}"
        ));
    }
    let labels = &spec["template"]["metadata"]["labels"];
    let selects_pod = |svc: &Doc| {
        svc.yaml["spec"]["selector"].as_hash().is_some_and(|sel| {
            !sel.is_empty()
                && sel
                    .iter()
                    .all(|(k, v)| &labels[k.as_str().unwrap_or("")] == v)
        })
    };
    let services = of_kind(docs, "Service");
    let governing = spec["serviceName"].as_str().unwrap_or("");
    if !services
        .iter()
        .any(|s| s.name() == governing && s.yaml["spec"]["clusterIP"].as_str() == Some("None"))
    {
        problems.push(format!(
            "{id}: serviceName {governing:?} is no headless Service"
        ));
    }
    let api: Vec<&&Doc> = services
        .iter()
        .filter(|s| s.yaml["spec"]["clusterIP"].as_str() != Some("None"))
        .collect();
    match api.as_slice() {
        [svc] => {
            let svc_spec = &svc.yaml["spec"];
            if !matches!(svc_spec["type"].as_str(), None | Some("ClusterIP")) {
                problems.push(format!("{}: type must be ClusterIP", svc.id()));
            }
            if !selects_pod(svc) {
                problems.push(format!(
                    "{}: selector does not match the pod labels",
                    svc.id()
                ));
            }
            if !seq(&svc_spec["ports"]).iter().any(|p| {
                let target = if p["targetPort"].is_badvalue() {
                    &p["port"]
                } else {
                    &p["targetPort"]
                };
                resolve_port(target, container) == Some(HTTP_PORT)
            }) {
                problems.push(format!("{}: no port targets {HTTP_PORT}", svc.id()));
            }
        }
        other => problems.push(format!(
            "expected one ClusterIP Service for the API, found {}",
            other.len()
        )),
    }

    // Shutdown: time to flush the batch and publish.
    if pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30) < 60 {
        problems.push(format!("{id}: terminationGracePeriodSeconds below 60"));
    }
    // Resources for a 2-core machine.
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            if container["resources"][kind][res].is_badvalue() {
                problems.push(format!("{id}: resources.{kind}.{res} missing"));
            }
        }
    }
    if cpu_millis(&container["resources"]["limits"]["cpu"]).is_some_and(|m| m > MAX_CPU_MILLIS) {
        problems.push(format!("{id}: cpu limit above the machine's 2 cores"));
    }
    problems.extend(check_non_root(&id, pod, container, image_uid));
    problems.extend(check_token_env(&id, container));

    // Data directory: --data-dir lies on a writable mount of a volumeClaimTemplate.
    let templates: Vec<String> = seq(&spec["volumeClaimTemplates"])
        .iter()
        .filter_map(|t| t["metadata"]["name"].as_str().map(String::from))
        .collect();
    problems.extend(check_mounts_resolve(&id, pod, container, &templates));
    match flag_value(&args, "--data-dir") {
        None => problems.push(format!("{id}: no --data-dir (it would default to ./state)")),
        Some(dir) => match mount_for(container, dir) {
            None => problems.push(format!("{id}: --data-dir {dir} is on no volumeMount")),
            Some(m) => {
                let name = m["name"].as_str().unwrap_or("");
                if !templates.iter().any(|t| t == name) {
                    problems.push(format!(
                        "{id}: --data-dir {dir} is on volume {name}, not on a volumeClaimTemplate"
                    ));
                }
                if m["readOnly"].as_bool() == Some(true) {
                    problems.push(format!("{id}: the data volume is mounted readOnly"));
                }
            }
        },
    }
    for t in seq(&spec["volumeClaimTemplates"]) {
        if !strings(&t["spec"]["accessModes"])
            .iter()
            .any(|m| m == "ReadWriteOnce")
        {
            problems.push(format!("{id}: volumeClaimTemplate is not ReadWriteOnce"));
        }
        if t["spec"]["resources"]["requests"]["storage"].is_badvalue() {
            problems.push(format!("{id}: volumeClaimTemplate requests no storage"));
        }
    }
    if let Some(out) = flag_value(&args, "--out") {
        let writable = mount_for(container, out).is_some_and(|m| {
            let name = m["name"].as_str().unwrap_or("");
            m["readOnly"].as_bool() != Some(true)
                && (templates.iter().any(|t| t == name)
                    || volume(pod, name).is_some_and(|v| !v["emptyDir"].is_badvalue()))
        });
        if !writable {
            problems.push(format!("{id}: --out {out} is on no writable volume"));
        }
    }
    problems.extend(check_config_mount(&id, docs, pod, container, &args));
    problems
}

/// `--config` is a read-only mount of the ConfigMap.
fn check_config_mount(
    id: &str,
    docs: &[Doc],
    pod: &Yaml,
    container: &Yaml,
    args: &[String],
) -> Vec<String> {
    let cm_name = of_kind(docs, "ConfigMap")
        .first()
        .map(|d| d.name().to_string());
    let Some(cfg) = flag_value(args, "--config") else {
        return vec![format!("{id}: no --config")];
    };
    let ok = mount_for(container, cfg).is_some_and(|m| {
        m["readOnly"].as_bool() == Some(true)
            && volume(pod, m["name"].as_str().unwrap_or(""))
                .and_then(|v| v["configMap"]["name"].as_str())
                .map(String::from)
                == cm_name
    });
    if ok {
        vec![]
    } else {
        vec![format!(
            "{id}: --config {cfg} is not a read-only mount of ConfigMap {cm_name:?}"
        )]
    }
}

/// The nightly finalize: valid schedule, never two at once, never on the sled volume, and
/// it asks the service over HTTP.
fn check_cronjob(docs: &[Doc]) -> Vec<String> {
    let cj = match only(docs, "CronJob") {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let id = cj.id();
    let spec = &cj.yaml["spec"];
    let mut problems = Vec::new();
    let schedule = spec["schedule"].as_str().unwrap_or("");
    if let Err(e) = check_cron(schedule) {
        problems.push(format!("{id}: schedule {schedule:?}: {e}"));
    }
    if spec["concurrencyPolicy"].as_str() != Some("Forbid") {
        problems.push(format!("{id}: concurrencyPolicy must be Forbid"));
    }
    let pod = &spec["jobTemplate"]["spec"]["template"]["spec"];
    if !matches!(pod["restartPolicy"].as_str(), Some("Never" | "OnFailure")) {
        problems.push(format!("{id}: restartPolicy must be Never or OnFailure"));
    }
    if seq(&pod["volumes"])
        .iter()
        .any(|v| !v["persistentVolumeClaim"].is_badvalue())
    {
        problems.push(format!(
            "{id}: mounts a PersistentVolumeClaim; the data directory belongs to the running service"
        ));
    }
    let Some(container) = seq(&pod["containers"]).first() else {
        return vec![format!("{id}: no container")];
    };
    problems.extend(check_non_root(&id, pod, container, None));
    problems.extend(check_mounts_resolve(&id, pod, container, &[]));
    problems.extend(check_token_env(&id, container));
    let script = [strings(&container["command"]), strings(&container["args"])]
        .concat()
        .join(" ");
    let env_text: String = seq(&container["env"])
        .iter()
        .filter_map(|e| e["value"].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    if !(script.contains("-X POST")
        && script.contains("/v1/experiments/")
        && script.contains("/finalize"))
    {
        problems.push(format!(
            "{id}: does not POST /v1/experiments/{{slug}}/finalize to the service"
        ));
    }
    if !script.contains(&format!("Authorization: Bearer ${{{TOKEN_ENV}}}")) {
        problems.push(format!(
            "{id}: does not send ${TOKEN_ENV} as a bearer token"
        ));
    }
    let api_url = of_kind(docs, "Service")
        .iter()
        .filter(|s| s.yaml["spec"]["clusterIP"].as_str() != Some("None"))
        .flat_map(|s| {
            seq(&s.yaml["spec"]["ports"])
                .iter()
                .filter_map(|p| p["port"].as_i64())
                .map(|port| format!("http://{}:{port}", s.name()))
                .collect::<Vec<_>>()
        })
        .find(|url| script.contains(url.as_str()) || env_text.contains(url.as_str()));
    if api_url.is_none() {
        problems.push(format!(
            "{id}: does not address the API Service (http://NAME:PORT)"
        ));
    }
    problems
}

/// The offline Job runs `slipstream finalize` on the StatefulSet's own claim.
fn check_offline_job(docs: &[Doc], image_uid: Option<i64>) -> Vec<String> {
    let jobs = of_kind(docs, "Job");
    let Some(job) = jobs.first() else {
        return vec![];
    };
    let id = job.id();
    let mut problems = Vec::new();
    if applied(docs).any(|d| d.kind() == "Job") {
        problems.push(format!(
            "{id}: a one-off Job must not be applied with the rest"
        ));
    }
    let pod = &job.yaml["spec"]["template"]["spec"];
    let Some(container) = seq(&pod["containers"]).first() else {
        return vec![format!("{id}: no container")];
    };
    let args = strings(&container["args"]);
    if args.first().map(String::as_str) != Some("finalize") {
        problems.push(format!(
            "{id}: must run `slipstream finalize`, args are {args:?}"
        ));
    }
    problems.extend(check_non_root(&id, pod, container, image_uid));
    problems.extend(check_mounts_resolve(&id, pod, container, &[]));
    problems.extend(check_config_mount(&id, docs, pod, container, &args));
    let expected_claim = only(docs, "StatefulSet").ok().and_then(|sts| {
        seq(&sts.yaml["spec"]["volumeClaimTemplates"])
            .first()
            .and_then(|t| t["metadata"]["name"].as_str())
            .map(|t| format!("{t}-{}-0", sts.name()))
    });
    match flag_value(&args, "--data-dir").map(|d| (d, mount_for(container, d))) {
        Some((_, Some(m))) => {
            let claim = volume(pod, m["name"].as_str().unwrap_or(""))
                .and_then(|v| v["persistentVolumeClaim"]["claimName"].as_str())
                .map(String::from);
            if claim.is_none() || claim != expected_claim {
                problems.push(format!(
                    "{id}: --data-dir is on claim {claim:?}, expected the StatefulSet's {expected_claim:?}"
                ));
            }
        }
        Some((dir, None)) => problems.push(format!("{id}: --data-dir {dir} is on no volumeMount")),
        None => problems.push(format!("{id}: no --data-dir")),
    }
    problems
}

/// A standard 5-field cron expression (minute hour day-of-month month day-of-week) with
/// `*`, lists, ranges, steps and month/day names, as Kubernetes CronJobs accept.
fn check_cron(expr: &str) -> Result<(), String> {
    const MONTHS: [&str; 12] = [
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ];
    const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("{} fields, expected 5", fields.len()));
    }
    let limits: [(&str, u32, u32, &[&str], u32); 5] = [
        ("minute", 0, 59, &[], 0),
        ("hour", 0, 23, &[], 0),
        ("day of month", 1, 31, &[], 0),
        ("month", 1, 12, &MONTHS, 1),
        ("day of week", 0, 7, &DAYS, 0),
    ];
    for (field, (what, lo, hi, names, first)) in fields.iter().zip(limits) {
        let value = |s: &str| -> Result<u32, String> {
            if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
                return Ok(i as u32 + first);
            }
            let v: u32 = s
                .parse()
                .map_err(|_| format!("{what}: {s:?} is not a number"))?;
            if v < lo || v > hi {
                return Err(format!("{what}: {v} outside {lo}..={hi}"));
            }
            Ok(v)
        };
        for part in field.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (part, None),
            };
            if let Some(step) = step {
                match step.parse::<u32>() {
                    Ok(s) if s > 0 => {}
                    _ => return Err(format!("{what}: bad step {step:?}")),
                }
            }
            if range == "*" {
                continue;
            }
            match range.split_once('-') {
                Some((a, b)) => {
                    if value(a)? > value(b)? {
                        return Err(format!("{what}: range {range} runs backwards"));
                    }
                }
                None => {
                    value(range)?;
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------

/// Instructions as (KEYWORD, arguments), continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (kw, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((kw.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// An exec-form (JSON array) instruction argument.
fn exec_form(s: &str) -> Option<Vec<String>> {
    serde_json::from_str(s).ok()
}

struct Image {
    uid: Option<i64>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn check_dockerfile(text: &str) -> (Vec<String>, Image) {
    let ins = dockerfile_instructions(text);
    let mut problems = Vec::new();
    let froms: Vec<(usize, &String)> = ins
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, (_, a))| (i, a))
        .collect();
    let stage_name = |a: &str| {
        let words: Vec<&str> = a.split_whitespace().collect();
        match words.as_slice() {
            [.., as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
            _ => None,
        }
    };
    if froms.len() < 2 {
        problems.push(format!(
            "{} FROM lines: not a multi-stage build",
            froms.len()
        ));
    }
    if !froms
        .iter()
        .any(|(_, a)| stage_name(a).as_deref() == Some("builder"))
    {
        problems.push("no `FROM ... AS builder` stage".into());
    }
    let last = froms.last().map_or(0, |(i, _)| *i);
    let final_stage = &ins[last..];
    if let Some((_, a)) = froms.last() {
        let base = a.split_whitespace().next().unwrap_or("");
        if base.eq_ignore_ascii_case("builder") || base.starts_with("rust:") {
            problems.push(format!(
                "the final stage is based on {base}, not a small runtime image"
            ));
        }
    }
    if !final_stage
        .iter()
        .any(|(k, a)| k == "COPY" && a.contains("--from=builder"))
    {
        problems.push("the final stage copies nothing from the builder".into());
    }
    let user = final_stage
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, a)| a.clone());
    let uid = match &user {
        None => {
            problems.push("no USER in the final stage: the container would run as root".into());
            None
        }
        Some(u) => {
            let name = u.split(':').next().unwrap_or("");
            if name == "root" || name == "0" {
                problems.push(format!("USER {u} is root"));
            }
            name.parse::<i64>().ok()
        }
    };
    let entrypoint = final_stage
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .and_then(|(_, a)| exec_form(a));
    if !entrypoint
        .as_ref()
        .and_then(|e| e.first())
        .is_some_and(|e| e.ends_with("/slipstream"))
    {
        problems.push(format!(
            "ENTRYPOINT is not the slipstream binary in exec form: {entrypoint:?}"
        ));
    }
    let cmd = final_stage
        .iter()
        .rev()
        .find(|(k, _)| k == "CMD")
        .and_then(|(_, a)| exec_form(a))
        .unwrap_or_default();
    let volumes: Vec<String> = final_stage
        .iter()
        .filter(|(k, _)| k == "VOLUME")
        .flat_map(|(_, a)| {
            exec_form(a).unwrap_or_else(|| a.split_whitespace().map(String::from).collect())
        })
        .collect();
    match flag_value(&cmd, "--data-dir") {
        Some(d) if volumes.iter().any(|v| under(d, v)) => {}
        other => problems.push(format!(
            "CMD --data-dir {other:?} is not on a VOLUME ({volumes:?})"
        )),
    }
    let exposed: Vec<&str> = final_stage
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .collect();
    let port = HTTP_PORT.to_string();
    if !exposed
        .iter()
        .any(|e| e.split('/').next() == Some(port.as_str()))
    {
        problems.push(format!("EXPOSE {HTTP_PORT} missing"));
    }
    if flag_value(&cmd, "--listen")
        .and_then(|l| l.rsplit_once(':'))
        .map(|(_, p)| p)
        != Some(port.as_str())
    {
        problems.push(format!("CMD --listen is not on port {HTTP_PORT}"));
    }
    let entrypoint = entrypoint.unwrap_or_default();
    (
        problems,
        Image {
            uid,
            entrypoint,
            cmd,
        },
    )
}

fn image() -> Image {
    let (problems, image) = check_dockerfile(&read(&root().join("deploy/docker/Dockerfile")));
    assert!(problems.is_empty(), "Dockerfile: {problems:#?}");
    image
}

fn all_problems(docs: &[Doc], uid: Option<i64>) -> Vec<String> {
    let example = read(&root().join("deploy/examples/experiment.toml"));
    [
        check_documents(docs),
        check_configmap(docs, &example),
        check_statefulset(docs, uid),
        check_cronjob(docs),
        check_offline_job(docs, uid),
    ]
    .concat()
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[test]
fn dockerfile_is_multi_stage_and_non_root() {
    let image = image();
    assert!(
        image.uid.is_some_and(|u| u != 0),
        "USER must be a numeric, non-root uid"
    );
}

#[test]
fn manifests_have_the_fields_that_matter() {
    let docs = k8s_docs();
    assert!(!docs.is_empty(), "no YAML under deploy/k8s");
    let problems = all_problems(&docs, image().uid);
    assert!(problems.is_empty(), "{problems:#?}");
}

fn help(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `--flag` of an argument list appears in `slipstream SUBCOMMAND --help`.
fn unknown_flags(args: &[String]) -> Vec<String> {
    let text = help(&[args[0].as_str()]);
    let words: BTreeSet<&str> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
        .collect();
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .filter(|f| !words.contains(f.as_str()))
        .collect()
}

#[test]
fn the_binary_accepts_the_flags_the_deployment_passes() {
    let docs = k8s_docs();
    let sts = only(&docs, "StatefulSet").unwrap();
    let sts_args = strings(&sts.yaml["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert_eq!(
        unknown_flags(&sts_args),
        Vec::<String>::new(),
        "StatefulSet args {sts_args:?}"
    );

    // The readiness probe runs the image's binary with flags `slipstream probe` accepts.
    let image = image();
    let probe =
        readiness_command(&sts.yaml["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]);
    assert_eq!(
        probe.first(),
        image.entrypoint.first(),
        "the readiness probe's binary is not the image's ENTRYPOINT"
    );
    assert_eq!(
        unknown_flags(&probe[1..]),
        Vec::<String>::new(),
        "readinessProbe {probe:?}"
    );

    let cmd = image.cmd;
    assert_eq!(
        unknown_flags(&cmd),
        Vec::<String>::new(),
        "Dockerfile CMD {cmd:?}"
    );
    if cmd[0] == "run" && flag_value(&cmd, "--brokers").is_none() {
        assert!(
            help(&["run"]).contains("SLIPSTREAM_BROKERS"),
            "the Dockerfile CMD leaves --brokers to the environment, but `slipstream run --help` \
             names no SLIPSTREAM_BROKERS (clap `env = \"SLIPSTREAM_BROKERS\"` on run's --brokers)"
        );
    }

    // The offline Job needs `finalize` (DESIGN.md section 9); checked once the command exists.
    for job in of_kind(&docs, "Job") {
        let args = strings(&job.yaml["spec"]["template"]["spec"]["containers"][0]["args"]);
        if help(&[])
            .lines()
            .any(|l| l.trim_start().starts_with("finalize"))
        {
            assert_eq!(
                unknown_flags(&args),
                Vec::<String>::new(),
                "{} args {args:?}",
                job.id()
            );
        } else {
            eprintln!(
                "skipped {}: this binary has no `finalize` command yet",
                job.id()
            );
        }
    }
}

#[test]
fn the_configmap_configs_pass_check_config() {
    let docs = k8s_docs();
    let cm = only(&docs, "ConfigMap").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (k, v) in cm.yaml["data"].as_hash().unwrap() {
        std::fs::write(dir.path().join(k.as_str().unwrap()), v.as_str().unwrap()).unwrap();
    }
    let out = Command::new(bin())
        .arg("check-config")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config on the ConfigMap: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn http_get(addr: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {response:?}"))
}

/// The probes of the manifests pass against the real server with the API token configured:
/// the httpGet ones on the open `/healthz` (kubelet sends no token), the readiness exec
/// probe by sending the token from the environment it shares with the server.
#[test]
fn the_probes_pass_with_the_token_in_force() {
    let docs = k8s_docs();
    let sts = only(&docs, "StatefulSet").unwrap();
    let container = &sts.yaml["spec"]["template"]["spec"]["containers"][0];
    let state = tempfile::tempdir().unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
    // With the token configured, as when the Secret exists: kubelet probes carry none.
    let token = "deploy-test-token";
    let mut child = Command::new(bin())
        .env(TOKEN_ENV, token)
        .args(["serve", "--config"])
        .arg(root().join("deploy/examples/experiment.toml"))
        .arg("--data-dir")
        .arg(state.path())
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = KillOnDrop(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(a) = line.split("serving on http://").nth(1) {
            break a.trim().to_string();
        }
    };
    let results: Vec<(String, u16)> = ["livenessProbe", "readinessProbe", "startupProbe"]
        .iter()
        .filter_map(|p| container[*p]["httpGet"]["path"].as_str())
        .map(|path| (path.to_string(), http_get(&addr, path)))
        .collect();
    for path in ["/v1/experiments", "/readyz"] {
        assert_eq!(
            http_get(&addr, path),
            401,
            "{path} without the token: the token should be in force"
        );
    }
    assert!(results.len() >= 2, "probes: {results:?}");
    for (path, status) in results {
        assert_eq!(
            status, 200,
            "probe path {path} answered {status} to a request without token ({TOKEN_ENV} set)"
        );
    }
    // The exec probe as the kubelet runs it, with this build's binary and the test port.
    let cmd = readiness_command(&container["readinessProbe"]);
    let run = |token: Option<&str>| {
        let args: Vec<String> = cmd[1..]
            .iter()
            .map(|a| a.replace(&format!("127.0.0.1:{HTTP_PORT}"), &addr))
            .collect();
        let mut c = Command::new(bin());
        c.args(&args).env_remove(TOKEN_ENV);
        if let Some(t) = token {
            c.env(TOKEN_ENV, t);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = run(Some(token));
    assert!(ok, "readiness probe {cmd:?} failed with the token: {out}");
    let (ok, out) = run(None);
    assert!(!ok, "readiness probe passed without the token: {out}");
}

#[test]
fn cron_expressions() {
    for ok in [
        "30 2 * * *",
        "*/15 0-6 1,15 JAN-MAR MON-FRI",
        "0 0 * * 7",
        "5 4 * * sun",
    ] {
        assert_eq!(check_cron(ok), Ok(()), "{ok}");
    }
    for bad in [
        "30 2 * *",
        "60 2 * * *",
        "30 24 * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "5-1 * * * *",
        "*/0 * * * *",
        "a b c d e",
        "@daily",
    ] {
        assert!(check_cron(bad).is_err(), "{bad} accepted");
    }
}

// ---------------------------------------------------------------------------------------
// The rules notice broken files
// ---------------------------------------------------------------------------------------

/// The manifests with the first `from` in one file replaced by `to`.
fn mutated(file: &str, from: &str, to: &str) -> Vec<Doc> {
    let dir = root().join("deploy/k8s");
    let mut docs = Vec::new();
    for doc in k8s_docs() {
        if doc.file != file {
            docs.push(doc);
        }
    }
    let text = read(&dir.join(file));
    assert!(text.contains(from), "{file} has no {from:?} to break");
    docs.extend(parse(file, &text.replacen(from, to, 1)));
    docs
}

fn assert_caught(docs: &[Doc], needle: &str) {
    let problems = all_problems(docs, Some(10001));
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

#[test]
fn broken_manifests_are_caught() {
    let sts = "statefulset.yaml";
    assert_caught(
        &mutated(
            sts,
            "livenessProbe:\n            httpGet:\n              path: /healthz",
            "livenessProbe:\n            httpGet:\n              path: /health",
        ),
        "livenessProbe path",
    );
    assert_caught(
        &mutated(sts, "- --ready", "- --live"),
        "readinessProbe runs",
    );
    assert_caught(
        &mutated(sts, "- http://127.0.0.1:8080", "- http://slipstream:8080"),
        "readinessProbe --url",
    );
    assert_caught(
        &mutated(
            sts,
            "exec:\n              command:\n                - /usr/local/bin/slipstream\n                - probe\n                - --ready\n                - --url\n                - http://127.0.0.1:8080\n                - --timeout-secs\n                - \"2\"",
            "httpGet:\n              path: /readyz\n              port: 8080",
        ),
        "cannot send the token",
    );
    assert_caught(
        &mutated(sts, "spec:\n  replicas: 1", "spec:\n  replicas: 2"),
        "replicas must be 1",
    );
    assert_caught(
        &mutated(sts, "- 0.0.0.0:8080", "- 127.0.0.1:8080"),
        "must bind all interfaces",
    );
    // The container-level settings win over the pod's, so break those.
    assert_caught(
        &mutated(
            sts,
            "runAsUser: 10001\n            capabilities",
            "runAsUser: 0\n            capabilities",
        ),
        "non-zero uid",
    );
    assert_caught(
        &mutated(
            sts,
            "runAsNonRoot: true\n            runAsUser",
            "runAsNonRoot: false\n            runAsUser",
        ),
        "runAsNonRoot is not true",
    );
    assert_caught(
        &mutated(
            sts,
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
        ),
        "readOnlyRootFilesystem",
    );
    assert_caught(
        &mutated(sts, "mountPath: /data", "mountPath: /var/lib/slipstream"),
        "--data-dir /data is on no volumeMount",
    );
    assert_caught(
        &mutated(
            sts,
            "- name: data            #",
            "- name: data\n              readOnly: true #",
        ),
        "mounted readOnly",
    );
    assert_caught(
        &mutated(
            sts,
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 10",
        ),
        "terminationGracePeriodSeconds",
    );
    assert_caught(&mutated(sts, "cpu: \"2\"", "cpu: \"4\""), "2 cores");
    assert_caught(
        &mutated(sts, "            - --data-dir\n            - /data\n", ""),
        "no --data-dir",
    );
    assert_caught(
        &mutated("service.yaml", "targetPort: http", "targetPort: 9090"),
        "no port targets 8080",
    );

    assert_caught(
        &mutated(
            sts,
            "optional: true\n            # Application",
            "optional: false\n            # Application",
        ),
        "optional Secret",
    );

    let cj = "cronjob-finalize.yaml";
    assert_caught(
        &mutated(cj, "schedule: \"30 2 * * *\"", "schedule: \"30 2 * *\""),
        "schedule",
    );
    assert_caught(
        &mutated(cj, "concurrencyPolicy: Forbid", "concurrencyPolicy: Allow"),
        "Forbid",
    );
    assert_caught(
        &mutated(
            cj,
            "value: http://slipstream:8080",
            "value: http://elsewhere:80",
        ),
        "API Service",
    );
    assert_caught(
        &mutated(
            cj,
            "configMap:\n                name: slipstream-config",
            "persistentVolumeClaim:\n                claimName: data-slipstream-0",
        ),
        "PersistentVolumeClaim",
    );
    assert_caught(
        &mutated(
            "offline/finalize-job.yaml",
            "claimName: data-slipstream-0",
            "claimName: data-other-0",
        ),
        "expected the StatefulSet's",
    );
    assert_caught(
        &mutated(
            "configmap.yaml",
            "enrollment_period = 7",
            "enrollment_period = 8",
        ),
        "differs from deploy/examples",
    );
    assert_caught(
        &mutated(
            "configmap.yaml",
            "metadata:\n",
            "metadata:\n  namespace: prod\n",
        ),
        "namespace",
    );
}

#[test]
fn broken_dockerfiles_are_caught() {
    let text = read(&root().join("deploy/docker/Dockerfile"));
    let caught = |from: &str, to: &str, needle: &str| {
        assert!(text.contains(from), "Dockerfile has no {from:?} to break");
        let (problems, _) = check_dockerfile(&text.replacen(from, to, 1));
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{from:?} -> {to:?}: expected {needle:?}, got {problems:#?}"
        );
    };
    caught("USER 10001:10001", "", "no USER");
    caught("USER 10001:10001", "USER root", "is root");
    caught("USER 10001:10001", "USER 0:0", "is root");
    caught(" AS builder", "", "AS builder");
    caught("FROM debian:bookworm-slim AS runtime", "", "multi-stage");
    caught("VOLUME [\"/data\"]", "VOLUME [\"/state\"]", "--data-dir");
    caught("EXPOSE 8080", "EXPOSE 9090", "EXPOSE 8080");
    caught(
        "ENTRYPOINT [\"/usr/local/bin/slipstream\"]",
        "ENTRYPOINT /bin/sh",
        "ENTRYPOINT",
    );
}
