// Tests run inside workerd (Cloudflare's runtime) through @cloudflare/vitest-pool-workers,
// offline: the origin is test/mock-origin.js, a real HTTP server on 127.0.0.1.
import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

export const TEST_SECRET = "edge-secret-for-tests-0123456789";

export default defineConfig({
  plugins: [
    cloudflareTest(({ inject }) => ({
      wrangler: { configPath: "./wrangler.toml" },
      miniflare: {
        bindings: { MOCK_ORIGIN: inject("mockOrigin"), ORIGIN_SECRET: TEST_SECRET },
      },
    })),
  ],
  test: {
    globalSetup: ["./test/mock-origin.js"],
    include: ["test/**/*.test.js"],
    testTimeout: 20000,
  },
});
