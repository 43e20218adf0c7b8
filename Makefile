# Installs livemig for hosts to build against:
#   make install [PREFIX=/usr/local] [DESTDIR=...]
# puts liblivemig.so.VERSION (SONAME liblivemig.so.MAJOR, with the
# liblivemig.so.MAJOR and liblivemig.so links), liblivemig.a, livemig.h and
# livemig.pc (pkg-config) under PREFIX; `make uninstall` removes them. Tests and the demo live in
# c-tests/ (see README).
CARGO      ?= cargo
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PCDIR      ?= $(LIBDIR)/pkgconfig
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
MAJOR      := $(firstword $(subst ., ,$(VERSION)))

.PHONY: all install uninstall
all:
	$(CARGO) build --release

install: all
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PCDIR)
	install -m 755 target/release/liblivemig.so $(DESTDIR)$(LIBDIR)/liblivemig.so.$(VERSION)
	ln -sf liblivemig.so.$(VERSION) $(DESTDIR)$(LIBDIR)/liblivemig.so.$(MAJOR)
	ln -sf liblivemig.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/liblivemig.so
	install -m 644 target/release/liblivemig.a $(DESTDIR)$(LIBDIR)/liblivemig.a
	install -m 644 include/livemig.h $(DESTDIR)$(INCLUDEDIR)/livemig.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(VERSION)|' livemig.pc.in > $(DESTDIR)$(PCDIR)/livemig.pc

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/liblivemig.so $(DESTDIR)$(LIBDIR)/liblivemig.so.$(MAJOR) \
	      $(DESTDIR)$(LIBDIR)/liblivemig.so.$(VERSION) $(DESTDIR)$(LIBDIR)/liblivemig.a \
	      $(DESTDIR)$(INCLUDEDIR)/livemig.h $(DESTDIR)$(PCDIR)/livemig.pc
