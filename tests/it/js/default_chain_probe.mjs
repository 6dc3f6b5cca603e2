// Pod-side probe: the JavaScript SDK v3's default credential chain, as an app that names no
// credentials gets it. An STS client built with no `credentials` walks the chain (environment,
// SSO, ini files, process, web identity, container endpoint, then instance metadata); with the
// scrubbed environment of testkit/src/sdk.rs only the instance-metadata step can answer.
// Then GetCallerIdentity proves the credentials work. Usage: node default_chain_probe.mjs <sts-url>
//
// Prints one JSON object on stdout: {"access_key_id", "caller_arn"}. Exits non-zero, with the
// reason on stderr, when no credentials were found or the STS call failed.

import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const stsUrl = process.argv[2];
try {
  const sts = new STSClient({ region: "us-east-1", endpoint: stsUrl });
  const identity = await sts.send(new GetCallerIdentityCommand({}));
  const credentials = await sts.config.credentials();
  console.log(JSON.stringify({ access_key_id: credentials.accessKeyId, caller_arn: identity.Arn }));
} catch (error) {
  console.error(`default chain probe failed: ${error?.name}: ${error?.message}`);
  process.exit(2);
}
