#!/bin/sh
# Run once by Patroni on the node that bootstraps the cluster, with a superuser
# connection string as $1: the hubs' role and database (the hub migrates the schema).
set -eu
psql "$1" -v ON_ERROR_STOP=1 -v pw="$HOOMI_DB_PASSWORD" <<'SQL'
CREATE ROLE hoomi LOGIN PASSWORD :'pw';
CREATE DATABASE hoomi OWNER hoomi;
SQL
