package runc

import (
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// The keeper holds the standard streams of every container process (see
// package keeper): without a terminal the process writes straight into
// containerd's FIFOs and the keeper keeps its stdin open until CloseIO;
// with a terminal the keeper takes the master from runc's console socket
// and copies between it and the FIFOs. Either way the streams outlive a
// daemon restart, and the daemon copies nothing.

// consoleSocketArg is the argument the keeper replaces with the path of
// its console socket.
const consoleSocketArg = "@console-socket@"

// ioKeyPrefix starts the key of every stream kuasar-runc has the keeper
// hold.
const ioKeyPrefix = "runc/"

// containerKey prefixes every stream the keeper holds for a container.
func containerKey(c *task.Container) string {
	return ioKeyPrefix + c.Namespace + "/" + c.ID + "/"
}

// ioKey is what the keeper holds a process's streams under.
func ioKey(p *task.Process) string {
	if p.ExecID == "" {
		return containerKey(p.Container) + "init"
	}
	return containerKey(p.Container) + "exec/" + p.ExecID
}

func apiStdio(io task.IO) *api.Stdio {
	return &api.Stdio{Stdin: io.Stdin, Stdout: io.Stdout, Stderr: io.Stderr, Terminal: io.Terminal}
}
