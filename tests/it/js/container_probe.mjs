// Pod-side probe: the node AWS SDK's default credential chain, in an environment that holds only
// AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (IMDS disabled),
// finds the container provider, then GetCallerIdentity proves the credentials work.
//
// Run by testkit/src/sdk.rs. Usage: node container_probe.mjs <sts-endpoint-url>
// Prints one JSON object on stdout: {"access_key_id", "caller_arn"}; exits non-zero on failure.

import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const stsUrl = process.argv[2];
try {
  const sts = new STSClient({ region: "us-east-1", endpoint: stsUrl });
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  const credentials = await sts.config.credentials();
  console.log(JSON.stringify({ access_key_id: credentials.accessKeyId, caller_arn: identity.Arn }));
} catch (error) {
  console.error(`node container probe failed: ${error?.name}: ${error?.message}`);
  process.exit(2);
}
