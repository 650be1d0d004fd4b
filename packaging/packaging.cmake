# Packages: the .deb and the .rpm, built by CPack from one install tree
# (scripts/package.sh; checked by tests/packaging/). Everything has a relative destination
# under CPACK_PACKAGING_INSTALL_PREFIX (/usr); nothing goes to /etc (the RPM generator
# would mark it %config). /etc/smtplb/smtplb.toml is the operator's file, never the
# package's: the maintainer scripts create the directory /etc/smtplb, and until the file
# exists the service does not start (ConditionPathExists= in the unit; the scripts say
# so), so that installing the package never puts smtplb on port 25 with placeholder
# backends. The reference configuration, every key with its default, is
# /usr/share/smtplb/smtplb.toml, the file to copy and edit.
# The project's identity in both packages: the .deb's Maintainer, the .rpm's Packager,
# and packaging/changelog's trailer line (tests/packaging/check-{deb,rpm}.sh compare them).
# Not a cache variable: a build tree configured before a change would keep the old value.
set(SMTPLB_PACKAGE_MAINTAINER "smtplb maintainers <smtplb@lists.smtplb.org>")

set(_smtplb_pkg_src ${CMAKE_CURRENT_SOURCE_DIR}/packaging)
set(_smtplb_pkg_bin ${CMAKE_CURRENT_BINARY_DIR}/packaging)

install(FILES conf/smtplb.toml conf/agent.toml DESTINATION share/smtplb)
# smtplb-agent.service is installed, never enabled by the maintainer scripts: it belongs
# on Postfix hosts, not on the balancer.
install(FILES ${_smtplb_pkg_src}/smtplb.service ${_smtplb_pkg_src}/smtplb-agent.service
        DESTINATION lib/systemd/system)
install(FILES ${_smtplb_pkg_src}/smtplb.sysusers DESTINATION lib/sysusers.d RENAME smtplb.conf)

# Man pages (hand-written roff, the version filled in) and the changelog, compressed
# reproducibly at configure time: configure_file() re-runs CMake when a source changes.
foreach(_page smtplb.8 smtplb.toml.5)
  configure_file(${_smtplb_pkg_src}/man/${_page} ${_smtplb_pkg_bin}/${_page} @ONLY)
endforeach()
configure_file(${_smtplb_pkg_src}/changelog ${_smtplb_pkg_bin}/changelog COPYONLY)
foreach(_f smtplb.8 smtplb.toml.5 changelog)
  execute_process(COMMAND gzip -9nf ${_smtplb_pkg_bin}/${_f} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "gzip ${_f} failed")
  endif()
endforeach()
install(FILES ${_smtplb_pkg_bin}/smtplb.8.gz DESTINATION share/man/man8)
install(FILES ${_smtplb_pkg_bin}/smtplb.toml.5.gz DESTINATION share/man/man5)
install(FILES ${_smtplb_pkg_src}/copyright ${_smtplb_pkg_bin}/changelog.gz DESTINATION share/doc/smtplb)
# The operator's kit, as documentation (nothing of it is active): a keepalived pair
# (docs/ha.md), Prometheus alerting rules, a Grafana dashboard.
install(FILES ${_smtplb_pkg_src}/keepalived/keepalived.conf ${_smtplb_pkg_src}/keepalived/smtplb-ha-network.sh
        DESTINATION share/doc/smtplb/examples/keepalived)
install(FILES ${_smtplb_pkg_src}/prometheus/smtplb.rules.yml DESTINATION share/doc/smtplb/examples/prometheus)
install(FILES ${_smtplb_pkg_src}/grafana/smtplb-dashboard.json DESTINATION share/doc/smtplb/examples/grafana)

set(CPACK_GENERATOR "DEB;RPM")
set(CPACK_PACKAGE_NAME smtplb)
set(CPACK_PACKAGE_VENDOR smtplb)
set(CPACK_PACKAGE_CONTACT "${SMTPLB_PACKAGE_MAINTAINER}")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "SMTP load balancer and health-checking proxy")
set(_smtplb_description
"smtplb spreads SMTP connections over backend MTAs such as Postfix
(weighted round-robin or least-connections) and relays the bytes both
ways. It joins a client to a backend only after the backend has greeted
with 220, probes every backend with a real SMTP dialogue and takes failing
ones out of rotation. PROXY protocol v1/v2, reload in place, graceful stop,
an admin API with Prometheus metrics, and a sandboxed systemd unit.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)

set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION "${_smtplb_description}")  # after the summary line
set(CPACK_DEBIAN_PACKAGE_SECTION mail)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# adduser: the maintainer scripts; procps: /bin/kill in ExecReload.
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser, procps")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
  ${_smtplb_pkg_src}/deb/postinst ${_smtplb_pkg_src}/deb/prerm
  ${_smtplb_pkg_src}/deb/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(CPACK_DEBIAN_COMPRESSION_TYPE xz)

set(CPACK_RPM_FILE_NAME RPM-DEFAULT)
set(CPACK_RPM_PACKAGE_RELEASE 1)
set(CPACK_PACKAGE_RELOCATABLE OFF)
set(CPACK_RPM_PACKAGE_DESCRIPTION "${_smtplb_description}")
set(CPACK_RPM_PACKAGE_LICENSE "LicenseRef-not-yet-chosen")
set(CPACK_RPM_PACKAGE_GROUP "System Environment/Daemons")
set(CPACK_RPM_PACKAGE_REQUIRES_PRE "shadow-utils")
# Scriptlets written by hand (the Debian build host has no systemd RPM macros).
set(CPACK_RPM_PRE_INSTALL_SCRIPT_FILE ${_smtplb_pkg_src}/rpm/pre.sh)
set(CPACK_RPM_POST_INSTALL_SCRIPT_FILE ${_smtplb_pkg_src}/rpm/post.sh)
set(CPACK_RPM_PRE_UNINSTALL_SCRIPT_FILE ${_smtplb_pkg_src}/rpm/preun.sh)
set(CPACK_RPM_POST_UNINSTALL_SCRIPT_FILE ${_smtplb_pkg_src}/rpm/postun.sh)
# Directories the system owns, not this package.
set(CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION
  /usr/sbin /usr/lib/systemd /usr/lib/systemd/system /usr/lib/sysusers.d
  /usr/share/man /usr/share/man/man5 /usr/share/man/man8)
# No /usr/lib/.build-id links, and no rpmbuild post-processing (brp-strip and friends):
# the .rpm ships the very binary of the .deb, already stripped by CPack.
# %packager fills the Packager tag.
set(CPACK_RPM_SPEC_MORE_DEFINE
  "%define _build_id_links none\n%define __os_install_post %{nil}\n%define packager ${SMTPLB_PACKAGE_MAINTAINER}")

include(CPack)
