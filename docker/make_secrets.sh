#!/usr/bin/env bash
# Writes the secrets of docker/compose.yaml: MongoDB's root user and a random password, and the URL that the driver
# and workers read with --mongo-file. Files are readable by their owner only; an existing set is kept (rotate by
# deleting the folder, and the mongo-data volume, whose users were made with the old password).
# Usage: bash docker/make_secrets.sh [DIR]   (default docker/secrets, which .gitignore keeps out of git)
set -euo pipefail
dir=${1:-"$(dirname "$0")/secrets"}
if [ -s "$dir/hpo_mongo_url" ]; then
    echo "make_secrets: $dir already holds secrets; kept" >&2
    exit 0
fi
umask 077
mkdir -p "$dir"
user=hpo
# Hex only: nothing in it needs percent-encoding in the URL.
password=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
printf '%s' "$user" >"$dir/mongo_root_user"
printf '%s' "$password" >"$dir/mongo_root_password"
printf 'mongodb://%s:%s@mongo:27017/hpo?authSource=admin\n' "$user" "$password" >"$dir/hpo_mongo_url"
echo "make_secrets: wrote $dir/{mongo_root_user,mongo_root_password,hpo_mongo_url}" >&2
