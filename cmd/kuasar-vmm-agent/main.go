// Command kuasar-vmm-agent is the guest agent of kuasar-vmm, PID 1 of the
// guest's initramfs (see package plugins/vmm/agent; contrib/guest builds
// the image). It must be built static (CGO_ENABLED=0).
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kuasar-io/containerd-kuasar/cmd/internal/version"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent"
)

func main() {
	started := time.Now()
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		version.Fprint(os.Stdout)
		return
	}
	if len(os.Args) > 1 && os.Args[1] == agent.PauseArg {
		// The init of a pod's shared PID namespace: PID 1 there too.
		agent.Pause()
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "kuasar-vmm-agent runs as PID 1 of a kuasar-vmm guest (see contrib/guest)")
		os.Exit(2)
	}
	logrus.SetOutput(os.Stderr) // the guest's console
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano, DisableColors: true})
	agent.Main(context.Background(), agent.Config{Version: version.Version, Revision: version.Revision, Started: started})
}
