#!/bin/sh
# The compose stack's own services (mariadb, redis, s3, nginx) in the services image built from Debian packages
# (tests/support/containers.py: no registry is reachable where it was written). `services.sh NAME` runs one in the
# foreground as the container's main process; the settings come from the environment (.env).
set -eu

case "$1" in
mariadb)
    # First start: a fresh data directory. Every start: the application's database and user from .env, through an
    # init file only mysql may read (it holds the password), removed once mariadbd has read it.
    if [ ! -d /var/lib/mysql/mysql ]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=socket >/dev/null
    fi
    install -d -o mysql -g mysql -m 0700 /run/mysqld
    init=/run/mysqld/init.sql
    umask 077
    cat > "$init" <<SQL
CREATE DATABASE IF NOT EXISTS \`${MARIADB_DATABASE}\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS '${MARIADB_USER}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD}';
ALTER USER '${MARIADB_USER}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD}';
GRANT ALL ON \`${MARIADB_DATABASE}\`.* TO '${MARIADB_USER}'@'%';
SQL
    chown mysql "$init"
    exec mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock --bind-address=0.0.0.0 \
        --port=3306 --skip-name-resolve --init-file="$init"
    ;;
redis)
    # The password goes in through a 0600 config file, never on the command line (ps would show it).
    umask 077
    printf 'requirepass %s\n' "$REDIS_PASSWORD" > /run/redis-password.conf
    exec redis-server /run/redis-password.conf --bind 0.0.0.0 --protected-mode no --dir /data \
        --appendonly yes --save ""
    ;;
s3)
    # moto's S3 server: a stand-in for Garage/MinIO (as in the rest of the tests), in memory. The bucket is made as
    # soon as it answers, so bunker_proxy's readiness (which checks the bucket) can pass.
    /opt/moto/bin/moto_server -H 0.0.0.0 -p 9000 &
    until curl -s -o /dev/null http://127.0.0.1:9000/; do sleep 0.2; done
    curl -sf -X PUT "http://127.0.0.1:9000/${S3_BUCKET}" >/dev/null
    touch /tmp/bucket-ready
    wait
    ;;
nginx)
    # nginx re-resolves the http replicas' name through podman's DNS (a replica replaced in a rolling upgrade has a
    # new address); its resolver takes no search list, hence the full name.
    resolver=$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)
    domain=$(awk '/^search/ { print $2; exit }' /etc/resolv.conf)
    suffix=${domain:+.$domain}
    sed -e "s/@RESOLVER@/$resolver/" -e "s/@SUFFIX@/$suffix/g" -e "s/@OPENAI_HOSTNAME@/${OPENAI_HOSTNAME:-_}/" \
        -e "s/@SERVER_NAME@/${SERVER_NAME:-_}/" /etc/scaigrid/nginx.conf.in > /tmp/nginx.conf
    exec nginx -c /tmp/nginx.conf
    ;;
*)
    echo "usage: services.sh mariadb|redis|s3|nginx" >&2
    exit 2
    ;;
esac
