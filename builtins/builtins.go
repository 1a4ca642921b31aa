// Package builtins is the plugin set of containerd-kuasar: every stock
// containerd built-in (including CRI) plus the Kuasar sandbox controllers.
// Importing it registers them all; Prepare must then be called once, before
// the daemon starts, to make the Kuasar plugins initialise ahead of
// containerd's task runtime and to add their CRI runtime handlers to the
// built-in defaults.
package builtins

import (
	// Stock containerd: the same set `containerd` itself is built with.
	_ "github.com/containerd/containerd/v2/cmd/containerd/builtins"

	// Kuasar sandbox controllers.
	_ "github.com/kuasar-io/containerd-kuasar/plugins/appkernel"
	_ "github.com/kuasar-io/containerd-kuasar/plugins/runc"
	_ "github.com/kuasar-io/containerd-kuasar/plugins/vmm"
	_ "github.com/kuasar-io/containerd-kuasar/plugins/wasm"
)
