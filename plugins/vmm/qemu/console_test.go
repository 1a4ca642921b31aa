package qemu

import (
	"strings"
	"testing"
)

// The guest's kernel is untrusted: it writes its serial console as fast
// as it likes, and forever. QEMU's "file" chardev appends it to
// console.log in the VM's run directory (<state>/../v/<pod>: /run, a tmpfs
// of the node), with no bound and no rotation: one pod fills the node's
// /run (containerd's, the kubelet's and every daemon's sockets and state)
// while its own logs, which the kubelet rotates, stay small. The console
// must be bounded (a "ringbuf" chardev of a fixed size, read over QMP when
// wanted, or a file the daemon caps).
func TestConsoleLogBounded(t *testing.T) {
	for _, c := range flags(Argv(baseConfig()), "-chardev") {
		if strings.Contains(c, "id=console") && strings.HasPrefix(c, "file,") {
			t.Errorf("the guest's console is an unbounded file of the node: -chardev %s", c)
		}
	}
}
