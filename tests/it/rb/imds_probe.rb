# Pod-side probe: the Ruby AWS SDK's instance-metadata provider (Aws::InstanceProfileCredentials,
# Debian's ruby-aws-sdk-core) finds credentials the way a pod's app would, then GetCallerIdentity
# proves they work.
#
# Run by testkit/src/sdk.rs inside a pod network namespace with a scrubbed environment, so
# the only credential source is the instance-metadata service (169.254.169.254, or the one named
# by AWS_EC2_METADATA_SERVICE_ENDPOINT). Usage: ruby imds_probe.rb <sts-endpoint-url>
#
# Prints one JSON object on stdout: {"access_key_id", "caller_arn"}. Exits non-zero, with the
# reason on stderr, when no credentials were found or the STS call failed.

require 'aws-sdk-core'
require 'json'

sts_url = ARGV.fetch(0)
begin
  # The SDK's defaults but for the timeouts, which a loaded CI machine can exceed.
  provider = Aws::InstanceProfileCredentials.new(retries: 1, http_open_timeout: 5, http_read_timeout: 5)
  unless provider.set?
    warn 'ruby probe failed: the instance-metadata provider found no credentials'
    exit 2
  end
  sts = Aws::STS::Client.new(region: 'us-east-1', endpoint: sts_url, credentials: provider)
  identity = sts.get_caller_identity
  puts JSON.generate(access_key_id: provider.credentials.access_key_id, caller_arn: identity.arn)
rescue StandardError => e
  warn "ruby probe failed: #{e.class}: #{e.message}"
  exit 2
end
