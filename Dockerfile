# kiam-rs: one image for every mode.
#   /kiam agent|server|health|explain|certs   (kiam's manifests and chart: command: [/kiam])
#   kube2iam [kube2iam's flags]                (the ENTRYPOINT: kube2iam's manifests give only
#                                               args; the binary runs kube2iam mode by that name)
# It carries iptables in both nft and legacy modes (deploy/image/iptables picks the node's).
#
# The default user is root (USER 0:0), as in kiam's and kube2iam's own images: their charts,
# when they install the iptables rule, grant capabilities (kiam's: add NET_ADMIN; kube2iam's:
# privileged) but never set runAsUser, and containerd and CRI-O give a non-root process no
# ambient capabilities, so under any other user `iptables` fails and pods reach the node's real
# metadata service. Least privilege comes from the securityContext instead: this project's chart
# and manifests set the user of every container, 65532:65532 with no capabilities wherever no
# iptables rule is written, and root with only NET_ADMIN and NET_RAW where one is (a server bound
# below port 1024 on the host network: root with only NET_BIND_SERVICE). docs/install.md.
#
# Build the binary first, on Debian 12 or a system with an older glibc:
#   cargo build --release --locked --bin kiam && docker build -t kiam-rs .
# (`bash scripts/image` builds and checks it without Docker.)
FROM docker.io/library/debian:bookworm-slim

# A base that already has them (as scripts/image builds offline) skips the download.
RUN if ! command -v iptables-legacy >/dev/null || [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends iptables ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# kiam's chart mounts the node's /usr/share/ca-certificates over /etc/ssl/certs; on Debian and
# Ubuntu nodes that holds only mozilla/*.crt subfolders, which no TLS library reads. A copy of
# the bundle outside that directory, a real file where kiam's Alpine image keeps one (and where
# the binary looks next), survives the mount. The binary logs at start where its roots came from.
RUN cp /etc/ssl/certs/ca-certificates.crt /etc/ssl/cert.pem

COPY target/release/kiam /kiam
COPY deploy/image/iptables /usr/local/sbin/iptables
RUN ln -s /kiam /usr/local/bin/kiam && ln -s /kiam /usr/local/bin/kube2iam

USER 0:0
ENTRYPOINT ["/usr/local/bin/kube2iam"]
