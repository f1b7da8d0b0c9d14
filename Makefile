# Packaging: `make rpm` builds the SRPM and the noarch RPMs under build/rpm from the working
# tree (tracked files plus untracked, not ignored ones); `make man` renders docs/*.rst.
# Needs rpmbuild (Debian: apt package rpm), rst2man (python3-docutils), and a python3 with
# jinja2 and pyroute2 (the RPM's %build renders the dashboards with it).

NAME    := bpftune
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TOPDIR  := $(CURDIR)/build/rpm
TARBALL := $(TOPDIR)/SOURCES/$(NAME)-$(VERSION).tar.gz
RST2MAN ?= rst2man
# Debian's rpmbuild cannot check BuildRequires against its empty rpm database.
RPMBUILD_FLAGS ?= $(if $(wildcard /etc/debian_version),--nodeps)

MAN_PAGES := $(patsubst docs/%.rst,build/man/%,$(wildcard docs/*.8.rst))

.PHONY: all man rpm tarball clean
all: man

man: $(MAN_PAGES)

build/man/%.8: docs/%.8.rst
	@mkdir -p $(@D)
	$(RST2MAN) --halt=warning $< $@

# Always rebuilt: the file list comes from git, not from make's dependencies. Files deleted
# from the working tree but still tracked are left out.
tarball:
	@mkdir -p $(TOPDIR)/SOURCES
	git ls-files -co --exclude-standard | while IFS= read -r f; do \
		[ -f "$$f" ] && printf '%s\0' "$$f"; done | \
	tar --null -T - --sort=name --owner=0 --group=0 --numeric-owner \
		--transform 's,^,$(NAME)-$(VERSION)/,' -czf $(TARBALL)

rpm: tarball
	@grep -Eq '^Version: +$(VERSION)$$' buildrpm/$(NAME).spec || \
		{ echo "buildrpm/$(NAME).spec: Version is not $(VERSION) (pyproject.toml)" >&2; exit 1; }
	rpmbuild -ba $(RPMBUILD_FLAGS) --define "_topdir $(TOPDIR)" buildrpm/$(NAME).spec
	@find $(TOPDIR)/SRPMS $(TOPDIR)/RPMS -name '*.rpm' | sort

clean:
	rm -rf build/rpm build/man
