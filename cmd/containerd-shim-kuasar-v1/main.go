// Command containerd-shim-kuasar-v1 is the runtime-type binary of the Kuasar
// runtime handlers (runtime_type "io.containerd.kuasar.v1").
//
// It is not a shim. Tasks of Kuasar sandboxes are served by containerd-kuasar
// itself, on an endpoint the sandbox controller returns. containerd still
// resolves a runtime type to a binary and runs it in two cases, which this
// answers: "delete" after a task connection closes (a no-op report: the
// daemon already cleaned the task up) and "-info" (runtime introspection).
// Anything else fails with an explanation.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	apitypes "github.com/containerd/containerd/api/types"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/containerd-kuasar/cmd/internal/version"

	// Registers the runtime-spec types (features among them) with typeurl,
	// under the URLs containerd decodes.
	_ "github.com/containerd/containerd/v2/core/runtime"
)

// RuntimeName is the runtime type this binary stands for.
const RuntimeName = "io.containerd.kuasar.v1"

// unknownStatus is reported by delete: the binary cannot know the exit
// status of a task whose endpoint went away; the daemon reported the real
// one already when it could.
const unknownStatus = 255

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	action, flags := parse(args)
	if flags["v"] || flags["version"] {
		version.Fprint(stdout)
		return 0
	}
	if flags["info"] {
		return info(stdin, stdout, stderr)
	}
	switch action {
	case "delete":
		b, err := proto.Marshal(&taskAPI.DeleteResponse{
			ExitStatus: unknownStatus,
			ExitedAt:   timestamppb.New(time.Now()),
		})
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		stdout.Write(b)
		return 0
	default:
		fmt.Fprintf(stderr, "containerd-shim-kuasar-v1: %q is not supported: this is not a shim. "+
			"Tasks of Kuasar sandboxes are served by containerd-kuasar; check that the CRI runtime handler "+
			"using runtime_type %q also sets sandboxer to a kuasar-* controller.\n", action, RuntimeName)
		return 1
	}
}

// parse splits Go-style flags (-name or -name value) from the action.
func parse(args []string) (string, map[string]bool) {
	flags := map[string]bool{}
	valueFlags := map[string]bool{"namespace": true, "address": true, "publish-binary": true, "id": true, "bundle": true, "socket": true}
	action := ""
	for i := 0; i < len(args); i++ {
		a := args[i]
		if len(a) > 1 && a[0] == '-' {
			name := a[1:]
			if len(name) > 0 && name[0] == '-' {
				name = name[1:]
			}
			flags[name] = true
			if valueFlags[name] {
				i++
			}
			continue
		}
		if action == "" {
			action = a
		}
	}
	return action, flags
}

// info reports the runtime, with the OCI runtime's features when runc is
// installed.
func info(stdin io.Reader, stdout, stderr io.Writer) int {
	_, _ = io.Copy(io.Discard, stdin)
	ri := &apitypes.RuntimeInfo{
		Name:    RuntimeName,
		Version: &apitypes.RuntimeVersion{Version: version.Version, Revision: version.Revision},
	}
	if path, err := exec.LookPath("runc"); err == nil {
		if out, err := exec.Command(path, "features").Output(); err == nil {
			var f features.Features
			if json.Unmarshal(out, &f) == nil {
				a, err := typeurl.MarshalAnyToProto(&f)
				if err != nil {
					fmt.Fprintln(stderr, "encoding runtime features:", err)
					return 1
				}
				ri.Features = a
			}
		}
	}
	b, err := proto.Marshal(ri)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	stdout.Write(b)
	return 0
}
