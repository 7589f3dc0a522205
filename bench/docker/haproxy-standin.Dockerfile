# A local stand-in for the official haproxy image, for machines that cannot pull from a registry
# (bench/rolling_restart.py builds it as haproxy:standin when HAPROXY_IMAGE is not pullable).
# Debian's HAProxy 2.6 on the python:3.12-slim base (../shared/tools/local-docker.sh makes that
# one); like the official image it runs as the haproxy user and reads
# /usr/local/etc/haproxy/haproxy.cfg.
FROM python:3.12-slim
RUN apt-get update -q && apt-get install -y -q --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /usr/local/etc/haproxy
USER haproxy
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
