#!/usr/bin/env bash
# One-time, per AWS account: the two instance profiles cluster/aws.yaml names, so that every node
# reaches S3 through its role and no key is ever written into a config, an image or a job.
#   deeprecognition-head    the autoscaler's rights (EC2, passing the worker role) + the bucket
#   deeprecognition-worker  the bucket only
# Usage: bash cluster/aws-iam.sh BUCKET        (run it again: it skips what already exists)
set -euo pipefail
BUCKET="${1:?usage: $0 BUCKET}"
ACCOUNT="$(aws sts get-caller-identity --query Account --output text)"
TRUST='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
BUCKET_POLICY="{\"Version\":\"2012-10-17\",\"Statement\":[
  {\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\",\"s3:GetBucketLocation\"],\"Resource\":\"arn:aws:s3:::${BUCKET}\"},
  {\"Effect\":\"Allow\",\"Action\":[\"s3:GetObject\",\"s3:PutObject\",\"s3:DeleteObject\",\"s3:AbortMultipartUpload\"],\"Resource\":\"arn:aws:s3:::${BUCKET}/*\"}]}"
PASS_WORKER="{\"Version\":\"2012-10-17\",\"Statement\":[
  {\"Effect\":\"Allow\",\"Action\":\"iam:PassRole\",\"Resource\":\"arn:aws:iam::${ACCOUNT}:role/deeprecognition-worker\"}]}"

profile() {  # NAME: a role trusted by EC2 and an instance profile holding it
  aws iam get-role --role-name "$1" >/dev/null 2>&1 \
    || aws iam create-role --role-name "$1" --assume-role-policy-document "$TRUST" >/dev/null
  aws iam put-role-policy --role-name "$1" --policy-name "s3-${BUCKET}" --policy-document "$BUCKET_POLICY"
  if ! aws iam get-instance-profile --instance-profile-name "$1" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$1" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$1" --role-name "$1"
  fi
}

profile deeprecognition-worker
profile deeprecognition-head
# What Ray's own default head role holds, plus the right to start workers with the worker role.
aws iam attach-role-policy --role-name deeprecognition-head --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess
aws iam put-role-policy --role-name deeprecognition-head --policy-name pass-worker-role --policy-document "$PASS_WORKER"
echo "instance profiles deeprecognition-head and deeprecognition-worker can reach s3://${BUCKET}"
