plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.gptsedge.sample"
    compileSdk = 34

    defaultConfig {
        applicationId = "dev.gptsedge.sample"
        minSdk = 24
        targetSdk = 34
        versionCode = 1
        versionName = "0.1"
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    // model.ort is already compressed weights; storing it uncompressed keeps the APK load fast.
    androidResources {
        noCompress += "ort"
    }
}

// Must not be older than the Python onnxruntime that converted model.ort (the ORT format is
// read by the same or newer runtimes). See README.md.
val onnxruntimeVersion: String = (project.findProperty("onnxruntimeVersion") as String?) ?: "1.32.0"

dependencies {
    implementation("com.microsoft.onnxruntime:onnxruntime-android:$onnxruntimeVersion")
}
