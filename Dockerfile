# kiam-rs: one image for every mode.
#   /kiam agent|server|health|explain|certs   (kiam's manifests and chart: command: [/kiam])
#   kube2iam [kube2iam's flags]                (the ENTRYPOINT: kube2iam's manifests give only
#                                               args; the binary runs kube2iam mode by that name)
# It carries iptables in both nft and legacy modes (deploy/image/iptables picks the node's) and
# runs as an unprivileged user: only the agent with --iptables needs root and NET_ADMIN, which
# the Helm chart and manifests grant to exactly that case.
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

COPY target/release/kiam /kiam
COPY deploy/image/iptables /usr/local/sbin/iptables
RUN ln -s /kiam /usr/local/bin/kiam && ln -s /kiam /usr/local/bin/kube2iam

USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kube2iam"]
