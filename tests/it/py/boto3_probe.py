"""Pod-side probe: boto3 finds credentials the way a pod's app would, then proves they work.

Run by testkit/src/sdk.rs inside a pod network namespace with a scrubbed environment, so
the only credential source boto3 can find is the instance-metadata service named by
AWS_EC2_METADATA_SERVICE_ENDPOINT. Usage: boto3_probe.py <sts-endpoint-url>

Prints one JSON object on stdout: {"access_key_id", "caller_arn", "method"}. Exits non-zero,
with the reason on stderr, when no credentials were found or the STS call failed.
"""

import json
import sys

import boto3


def main() -> int:
    sts_url = sys.argv[1]
    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        print("boto3 found no credentials", file=sys.stderr)
        return 2
    frozen = credentials.get_frozen_credentials()
    identity = session.client("sts", endpoint_url=sts_url).get_caller_identity()
    print(
        json.dumps(
            {
                "access_key_id": frozen.access_key,
                "caller_arn": identity["Arn"],
                "method": credentials.method,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
