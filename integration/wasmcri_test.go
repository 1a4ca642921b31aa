//go:build e2e || bench || pkg || kube

package integration

import runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

const kuasarWasm = "kuasar-wasm"

// wasmConfig is a container of a Wasm image, running the module with args
// (for the test module, integration/wasmapp, its command and arguments).
func wasmConfig(name, image string, args ...string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: image},
		Args:     args,
		LogPath:  name + ".log",
		Linux:    &runtimeapi.LinuxContainerConfig{},
	}
}
