// Package version holds the build identity of containerd-kuasar: its own
// release version and the upstream containerd release it is built on. The
// values are stamped at link time by the Makefile.
package version

import (
	"fmt"
	"io"
	"runtime"

	cversion "github.com/containerd/containerd/v2/version"
)

var (
	// Name of the distribution.
	Name = "containerd-kuasar"
	// Version of containerd-kuasar, set with -ldflags -X.
	Version = "0.1.0-dev"
	// Revision is the git commit containerd-kuasar was built from.
	Revision = ""
)

// Containerd returns the upstream containerd version compiled in.
func Containerd() string { return cversion.Version }

// Fprint writes the one-line version banner shown by --version.
func Fprint(w io.Writer) {
	rev := Revision
	if rev == "" {
		rev = "unknown"
	}
	fmt.Fprintf(w, "%s %s (revision %s, containerd %s %s, %s)\n",
		Name, Version, rev, cversion.Package, Containerd(), runtime.Version())
}
