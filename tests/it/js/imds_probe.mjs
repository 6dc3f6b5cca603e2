// Pod-side probe: the node AWS SDK's instance-metadata provider finds credentials the way a pod's
// app would, then GetCallerIdentity proves they work.
//
// Run by testkit/src/sdk.rs inside a pod network namespace with a scrubbed environment, so
// the only credential source is the instance-metadata service (169.254.169.254, or the one named
// by AWS_EC2_METADATA_SERVICE_ENDPOINT). Usage: node imds_probe.mjs <sts-endpoint-url>
//
// Prints one JSON object on stdout: {"access_key_id", "caller_arn"}. Exits non-zero, with the
// reason on stderr, when no credentials were found or the STS call failed.

import { fromInstanceMetadata } from "@smithy/credential-provider-imds";
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const stsUrl = process.argv[2];
try {
  const credentials = await fromInstanceMetadata({ timeout: 5000, maxRetries: 1 })();
  const sts = new STSClient({ region: "us-east-1", endpoint: stsUrl, credentials });
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  console.log(JSON.stringify({ access_key_id: credentials.accessKeyId, caller_arn: identity.Arn }));
} catch (error) {
  console.error(`node probe failed: ${error?.name}: ${error?.message}`);
  process.exit(2);
}
