#!/bin/sh
# HAProxy external check of a Galera node: succeeds only while the node is Synced (wsrep_local_state 4) in the
# Primary component. HAProxy passes: proxy address, proxy port, server address, server port. The check user needs
# no privileges (CREATE USER clustercheck@... IDENTIFIED BY ...); its credentials are in clustercheck.cnf next to
# this script (0600, a [client] section with user= and password=): HAProxy gives the script an empty environment.
set -eu
status=$(mariadb --defaults-extra-file="$(dirname "$0")/clustercheck.cnf" --protocol=TCP --host="$3" --port="$4" \
    --connect-timeout=1 --batch --skip-column-names \
    -e "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_state', 'wsrep_cluster_status')")
printf '%s\n' "$status" | grep -q '^wsrep_cluster_status[[:space:]]Primary$' || exit 1
printf '%s\n' "$status" | grep -q '^wsrep_local_state[[:space:]]4$' || exit 1
